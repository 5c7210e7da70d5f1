"""`cleanplate batch run --ray`: the batch job as a Ray Data pipeline on a real local Ray cluster (2 CPUs,
127.0.0.1, no dashboard) over real photos with the tiny gated bundle: the same outputs pixel for pixel and
byte for byte (given the same torch threads and batches), the same report fields and review queue as the
local runner; a rerun skips done items; a bad manifest stops the command before any work (exit 2); a model
actor killed mid-run is restarted by Ray and every item is done exactly once; a driver killed with SIGKILL
leaves only whole outputs and the rerun does each remaining item once.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import test_batch
import test_batch_s3
from test_storage import _photo_set, _upload

from cleanplate import storage
from cleanplate.batch import read_report
from cleanplate.imaging import decode_image

pytestmark = pytest.mark.slow  # a Ray cluster and its workers start in ~20 s on this 2-core machine
ray = pytest.importorskip("ray")

# One torch thread and no micro-batching on both sides: another thread count or batch composition sums floats
# in another order (~1e-6), which now and then moves a pixel across a rounding step and changes a JPEG's bytes.
ARGS = ["--dilate-px", 2, "--threshold", 0.5, "--max-attempts", 2, "--progress", "off", "--torch-threads", 1,
        "--max-batch", 1]
FIELDS = ("key", "status", "passed", "score", "threshold", "attempts", "seed", "bytes", "width", "height", "mask",
          "image", "output", "review")


s3 = test_batch_s3.s3  # the S3 server on 127.0.0.1, started before the cluster so that workers see it


@pytest.fixture(scope="module")
def cluster(s3):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cleanplate.batch.ray_runner import loopback_only

    loopback_only()  # GCS, raylet and workers listen on 127.0.0.1 only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog(photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raycat")
    _photo_set(photos, root)
    for i, name in enumerate(["camera", "coffee"]):  # two more: a grey image and a JPEG
        px = photos[name][100 + 10 * i:196 + 10 * i, 150:278]
        from PIL import Image

        Image.fromarray(px).save(root / "photos" / f"extra{i}.{'png' if i == 0 else 'jpg'}", quality=90)
        m = np.zeros(px.shape[:2], np.uint8)
        m[20:50, 30:90] = 255
        Image.fromarray(m).save(root / "masks" / f"extra{i}.png")
    return root


def _assert_same_rows(a: list[list], b: list[list]) -> None:
    """Equal report rows; gate scores within 1e-5 (an actor's torch may sum in another order: the pixels are
    compared exactly elsewhere)."""
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b, strict=True):
        for va, vb in zip(row_a, row_b, strict=True):
            assert (abs(va - vb) <= 1e-5) if isinstance(va, float) and isinstance(vb, float) else va == vb, (row_a, row_b)


def _rows(report: Path, root: Path) -> list[list]:
    lines, bad = read_report(report)
    assert bad == 0
    rows = []
    for x in lines:
        rows.append([(x[f].replace(str(root), "ROOT") if isinstance(x[f], str) else x[f]) for f in FIELDS])
    return sorted(rows)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name not in ("report.jsonl", ".cleanplate-batch.lock", "item.json")}


def test_ray_run_equals_local_run_and_resumes(cli, cluster, gated_bundle, catalog):
    src, masks = catalog / "photos", catalog / "masks"
    r = cli("batch", "run", src, "--masks", masks, "-o", catalog / "local", "--bundle", gated_bundle, *ARGS)
    assert r.code == 0, r.err
    r = cli("batch", "run", src, "--masks", masks, "-o", catalog / "ray", "--bundle", gated_bundle, *ARGS,
            "--ray", "--workers", 1, "--batch-size", 2)
    assert r.code == 0, r.err
    assert "batch: 5 items: 5 ok" in r.err
    local, remote = _files(catalog / "local"), _files(catalog / "ray")
    assert sorted(local) == sorted(remote) and len(local) >= 5
    for key in local:
        assert local[key] == remote[key], key
        if not key.startswith("review/"):
            assert np.array_equal(decode_image(catalog / "local" / key).pixels, decode_image(catalog / "ray" / key).pixels)
    a = _rows(catalog / "local" / "report.jsonl", catalog / "local")
    b = _rows(catalog / "ray" / "report.jsonl", catalog / "ray")
    _assert_same_rows(a, b)
    for x in read_report(catalog / "ray" / "report.jsonl")[0]:
        assert x["run"].endswith("-ray") and x["timings_ms"]["total"] > 0 and "model" in x["timings_ms"]
        if x["review"]:
            assert json.loads((Path(x["review"]) / "item.json").read_text()) == x
    # a rerun skips every done item; a deleted output is redone, only it
    (catalog / "ray" / "coffee.png").unlink()
    r = cli("batch", "run", src, "--masks", masks, "-o", catalog / "ray", "--bundle", gated_bundle, *ARGS, "--ray")
    assert r.code == 0 and "4 done before" in r.err, r.err
    keys = [x["key"] for x in read_report(catalog / "ray" / "report.jsonl")[0]]
    assert len(keys) == 6 and keys.count("coffee.png") == 2
    assert _files(catalog / "ray") == remote
    r = cli("batch", "run", src, "--masks", masks, "-o", catalog / "ray", "--bundle", gated_bundle, *ARGS, "--ray")
    assert r.code == 0 and "5 done before" in r.err
    r = cli("batch", "summarize", catalog / "ray" / "report.jsonl", "--json")
    assert json.loads(r.out)["ok"] == 5


def test_ray_from_s3_to_s3_equals_local(cli, cluster, s3, gated_bundle, catalog, tmp_path):
    """Workers read and write the bucket through the same s3fs paths: same bytes as the local runner."""
    _upload(catalog / "photos", f"{s3}/ray/photos")
    _upload(catalog / "masks", f"{s3}/ray/masks")
    r = cli("batch", "run", catalog / "photos", "--masks", catalog / "masks", "-o", tmp_path / "local", "--bundle",
            gated_bundle, *ARGS)
    assert r.code == 0, r.err
    out = f"{s3}/ray/out"
    r = cli("batch", "run", f"{s3}/ray/photos", "--masks", f"{s3}/ray/masks", "-o", out, "--bundle", gated_bundle,
            *ARGS, "--ray", "--batch-size", 3)
    assert r.code == 0, r.err
    local = _files(tmp_path / "local")
    remote = {k: storage.read_bytes(f"{out}/{k}") for k in storage.sizes_under(out)
              if not k.endswith(("report.jsonl", "item.json"))}
    assert sorted(local) == sorted(remote) and all(local[k] == remote[k] for k in local)
    lines, bad = read_report(f"{out}/report.jsonl")
    assert bad == 0 and len(lines) == 5 and all(x["output"] == f"{out}/{x['key']}" for x in lines)
    assert not storage.exists(f"{out}/report.jsonl.parts")
    r = cli("batch", "run", f"{s3}/ray/photos", "--masks", f"{s3}/ray/masks", "-o", out, "--bundle", gated_bundle,
            *ARGS, "--ray")
    assert r.code == 0 and "5 done before" in r.err, r.err


def test_ray_broken_items_are_error_lines(cli, cluster, catalog, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "img" / "nomask.png").write_bytes((catalog / "photos" / "coffee.png").read_bytes())
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "broken.png").write_bytes((catalog / "masks" / "coffee.png").read_bytes())
    codes = {}
    for out, extra in (("local", []), ("ray", ["--ray"])):
        r = cli("batch", "run", tmp_path / "img", "--masks", tmp_path / "masks", "-o", tmp_path / out, "--engine",
                "opencv", "--progress", "off", *extra)
        assert r.code == 1, r.err  # errors are lines, never a stopped run
        codes[out] = {x["key"]: x["error"] for x in read_report(tmp_path / out / "report.jsonl")[0]}
    assert codes["ray"] == codes["local"]
    assert codes["ray"]["broken.png"]["code"] == "unsupported_image"
    assert codes["ray"]["nomask.png"]["code"] == "missing_mask"


@pytest.mark.parametrize("case", ["bad_json", "unknown_field", "duplicate_output"])
def test_ray_bad_manifest_exits_2_before_work(cli, cluster, catalog, tmp_path, case):
    lines = [json.dumps({"image": str(catalog / "photos" / "coffee.png")})]
    if case == "bad_json":
        lines.append("{nope")
        expected = "m.jsonl:2"
    elif case == "unknown_field":
        lines.append(json.dumps({"image": "x.png", "dilate": 3}))
        expected = "dilate"
    else:
        lines.append(json.dumps({"image": str(catalog / "photos" / "chelsea.png"), "output": "coffee.png"}))
        expected = "'coffee.png'"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    r = cli("batch", "run", manifest, "-o", tmp_path / "out", "--engine", "opencv", "--ray")
    assert r.code == 2, r.err
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()


def _pids(*needles: bytes) -> list[int]:
    """PIDs whose command line holds one of ``needles``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                pids.append(int(entry.name))
    return pids


def _model_actor_pids() -> list[int]:
    """PIDs of the model actors (process title ``ray::MapWorker(MapBatches(ModelStage))``)."""
    return _pids(b"MapBatches(ModelStage)")


RAY_PROCESSES = (b"ray::", b"gcs_server", b"raylet", b"ray/dashboard", b"ray/_private")


def test_ray_model_worker_killed_mid_run_every_item_done_once(cluster, gated_bundle, photos, tmp_path):
    """SIGKILL the model actor after a few items: Ray restarts it and retries its batch; after a rerun every
    item has exactly one report line (ok) and its output, and nothing is left half-written."""
    import threading
    import time

    from PIL import Image

    from cleanplate.batch import ItemOptions, load_items
    from cleanplate.batch.ray_runner import run_batch_ray

    n = 30
    for i in range(n):
        name = ["coffee", "chelsea", "astronaut"][i % 3]
        px = photos[name][20 + 3 * (i // 3):116 + 3 * (i // 3), 40:168]
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "mask").mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(px)).save(tmp_path / "img" / f"{i:02d}.png")
        m = np.zeros((96, 128), np.uint8)
        m[30 + i % 20:50 + i % 20, 40:70] = 255
        Image.fromarray(m).save(tmp_path / "mask" / f"{i:02d}.png")
    items = load_items(tmp_path / "img", masks=tmp_path / "mask")
    out = tmp_path / "out"
    report = out / "report.jsonl"
    engine = {"engine": "torch", "bundle": gated_bundle, "torch_threads": 1}
    outcome: dict[str, object] = {}

    def first_run() -> None:
        try:
            outcome["result"] = run_batch_ray(items, engine, out, batch_size=1, handle_signals=False,
                                              defaults=ItemOptions(dilate_px=2, max_attempts=1, seed=0))
        except Exception as exc:  # the run may fail; the rerun must finish it
            outcome["error"] = exc

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not report.exists() or len(report.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    pids = _model_actor_pids()
    lines_at_kill = len(report.read_bytes().splitlines())
    assert pids and lines_at_kill < n, (pids, lines_at_kill)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive()
    print(f"killed {pids} after {lines_at_kill} lines; first run: {outcome}")  # pytest -rP shows it
    again = run_batch_ray(items, engine, out, batch_size=1, handle_signals=False,
                          defaults=ItemOptions(dilate_px=2, max_attempts=1, seed=0))
    lines, bad = read_report(report)
    keys = [x["key"] for x in lines]
    assert bad == 0 and sorted(keys) == sorted(i.key for i in items), (outcome, keys)  # each once
    assert all(x["status"] == "ok" and (out / x["key"]).stat().st_size == x["bytes"] for x in lines)
    assert again.done_before + again.ok == n
    assert not [p for p in out.rglob(".*.tmp")]


def test_ray_flag_takes_an_optional_address():
    from cleanplate.cli import _ray_flag

    base = ["cleanplate", "batch", "run", "photos", "-o", "out"]
    assert _ray_flag([*base, "--ray"])[-2:] == ["--ray", "local"]
    assert _ray_flag([*base, "--ray", "--workers", "2"])[6:8] == ["--ray", "local"]
    assert _ray_flag([*base, "--ray", "auto"]) == [*base, "--ray", "auto"]
    assert _ray_flag([*base, "--ray", "10.0.0.5:6379"]) == [*base, "--ray", "10.0.0.5:6379"]
    assert _ray_flag([*base, "--ray", "ray://head:10001"]) == [*base, "--ray", "ray://head:10001"]
    assert _ray_flag(["cleanplate", "batch", "run", "--ray", "photos", "-o", "o"])[3:6] == ["--ray", "local", "photos"]


kill_catalog = test_batch.kill_catalog  # 40 real-photo crops with masks


def _orphans(pids: set[int]) -> set[int]:
    """Those of ``pids`` whose parent is gone (re-parented to init): a dead cluster's leftovers."""
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == "1":
                out.add(pid)
        except (OSError, IndexError):
            pass
    return out


def test_ray_driver_sigkilled_then_rerun_does_each_item_once(cluster, gated_bundle, kill_catalog, tmp_path):
    """SIGKILL the driver of `batch run --ray` (its own local cluster dies with it) midway: what is on disk is
    whole, and the rerun finishes the rest with each item done exactly once."""
    images, masks = kill_catalog
    out = tmp_path / "out"
    args = ["batch", "run", images, "--masks", masks, "-o", out, "--bundle", gated_bundle, "--ray", "--batch-size", 2]
    before = set(_pids(*RAY_PROCESSES))
    try:
        proc = test_batch._start(args, tmp_path)
        test_batch._wait_lines(proc, out / "report.jsonl", 4, timeout_s=240)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        first = test_batch.lines_by_key(out / "report.jsonl")
        assert 4 <= len(first) < test_batch.N_KILL, "the kill did not land midway"
        for p in out.glob("*.png"):  # whatever is on disk is a whole image, never a truncated one
            assert decode_image(p).size == (test_batch.W, test_batch.H)
        proc = test_batch._start(args, tmp_path)
        assert proc.wait(400) == 0, test_batch._stderr(proc)
        assert f"{len(first)} done before" in test_batch._stderr(proc)
        by_key = test_batch._check_complete(images, out)
        for key, recs in first.items():  # items finished before the kill were not touched again
            assert by_key[key] == recs
    finally:
        # The killed driver's node agents (DashboardAgent, RuntimeEnvAgent) outlive it for a while: end them.
        for pid in _orphans(set(_pids(*RAY_PROCESSES)) - before):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_cli_bench_batch_ray_mode_compares_with_the_local_runner(gated_bundle, tmp_path):
    """`bench batch --mode in-process ray` at toy size: the Ray runner cleans the whole catalog at each worker
    count on one local cluster of its own (a subprocess: the module's 2-CPU cluster has no room for two model
    actors and their read and write tasks), and the report has the Ray / local ratio and the scaling estimate."""
    import subprocess
    import sys

    out = tmp_path / "res" / "batch_ray"
    args = ["bench", "batch", "--images", 4, "--concurrency", 2, "--size", 64, "--bundle", gated_bundle,
            "--mode", "in-process", "ray", "--ray-workers", 1, 2, "--out", out]
    done = subprocess.run([sys.executable, "-m", "cleanplate.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(x["mode"], x["workers"], x["concurrency"]) for x in report["runs"]] == [
        ("in-process", 1, 2), ("ray", 1, 2), ("ray", 2, 2)]
    assert all((run["ok"], run["errors"]) == (4, 0) for run in report["runs"])
    ray_run = report["runs"][1]
    assert {"load", "model", "encode", "write", "total"} <= set(ray_run["stages_ms_p50"])
    assert ray_run["driver_ms_per_record"] > 0
    md = out.with_suffix(".md").read_text()
    assert "## Ray runner vs local runner" in md and "## Scaling estimate for N GPU workers" in md
