"""`cleanplate batch run` against an S3 server: sources, masks, manifest, outputs, report and review all at
``s3://`` URLs, through the same fsspec paths (s3fs) as production.

The server is moto's ``ThreadedMotoServer`` (``moto[server]``, Apache-2.0): a real HTTP S3 endpoint that the
tests start in-process on 127.0.0.1 (a free port) and stop at the end, pure Python from the package registry
(no Docker, no binary download), speaking the S3 REST API that s3fs/aiobotocore use (ListObjectsV2, ranged
GET, PUT, multipart, DeleteObjects), so the code under test is the production client talking HTTP. s3fs
finds it through ``AWS_ENDPOINT_URL`` as it would find MinIO or Ceph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_storage import _photo_set, _upload

from cleanplate import storage
from cleanplate.batch import read_report

ARGS = ["--dilate-px", 2, "--threshold", 0.5, "--max-attempts", 1, "--progress", "off"]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 with an empty bucket; yields ``s3://catalog-<random>``. moto keeps its
    buckets in process-wide state, so each use gets its own bucket and the state is reset at the end."""
    pytest.importorskip("s3fs")
    import logging
    import urllib.request
    import uuid

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"catalog-{uuid.uuid4().hex[:8]}"
    try:
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"),
                               timeout=10).close()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _outputs_local(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name not in ("report.jsonl", "item.json", ".cleanplate-batch.lock")}


def _outputs_url(out: str) -> dict[str, bytes]:
    return {k: storage.read_bytes(f"{out}/{k}") for k in storage.sizes_under(out)
            if not k.endswith(("report.jsonl", "item.json"))}


@pytest.fixture(scope="module")
def catalog(s3, photos, gated_bundle, tmp_path_factory):
    """The photo set locally and in the bucket, and the local run's output folder."""
    root = tmp_path_factory.mktemp("s3cat")
    _photo_set(photos, root)
    _upload(root / "photos", f"{s3}/photos")
    _upload(root / "masks", f"{s3}/masks")
    return root


def test_s3_run_equals_local_run_byte_for_byte(cli, gated_bundle, catalog, s3):
    r = cli("batch", "run", catalog / "photos", "--masks", catalog / "masks", "-o", catalog / "out",
            "--bundle", gated_bundle, *ARGS)
    assert r.code == 0, r.err
    r = cli("batch", "run", f"{s3}/photos", "--masks", f"{s3}/masks", "-o", f"{s3}/out", "--bundle", gated_bundle,
            *ARGS)
    assert r.code == 0, r.err
    local, remote = _outputs_local(catalog / "out"), _outputs_url(f"{s3}/out")
    assert sorted(local) == sorted(remote) and len(local) >= 3
    for key in local:
        assert local[key] == remote[key], key
    lines, bad = read_report(f"{s3}/out/report.jsonl")
    local_lines, _ = read_report(catalog / "out" / "report.jsonl")
    assert bad == 0 and len(lines) == 3
    fields = ("key", "status", "passed", "score", "attempts", "seed", "bytes", "width", "height")
    assert sorted([[x[f] for f in fields] for x in lines]) == sorted([[x[f] for f in fields] for x in local_lines])
    assert all(x["image"].startswith(f"{s3}/photos/") and x["mask"].startswith(f"{s3}/masks/") for x in lines)
    assert not storage.exists(f"{s3}/out/report.jsonl.parts")  # fragments merged
    for x in lines:
        if x["review"]:
            assert x["review"].startswith(f"{s3}/out/review/")
            assert json.loads(storage.read_bytes(f"{x['review']}/item.json"))["score"] == x["score"]


def test_s3_rerun_skips_done_items_and_redoes_a_missing_output(cli, gated_bundle, catalog, s3):
    out = f"{s3}/resume"
    run = ("batch", "run", f"{s3}/photos", "--masks", f"{s3}/masks", "-o", out, "--bundle", gated_bundle, *ARGS)
    assert cli(*run).code == 0
    first = _outputs_url(out)
    r = cli(*run)
    assert r.code == 0 and "3 done before" in r.err, r.err
    assert len(read_report(f"{out}/report.jsonl")[0]) == 3
    storage.remove(f"{out}/coffee.png")  # a lost output is redone, and only it
    r = cli(*run)
    assert r.code == 0 and "2 done before" in r.err, r.err
    lines, _ = read_report(f"{out}/report.jsonl")
    assert [x["key"] for x in lines].count("coffee.png") == 2 and len(lines) == 4
    assert _outputs_url(out) == first


def test_s3_manifest_with_relative_paths(cli, catalog, s3):
    entries = [{"image": "photos/coffee.png", "mask": "masks/coffee.png", "output": "a/coffee.jpg"},
               {"image": f"{s3}/photos/sub/astronaut.png", "mask": "masks/sub/astronaut.png"}]
    storage.write_bytes(f"{s3}/list.jsonl", "".join(json.dumps(e) + "\n" for e in entries).encode())
    r = cli("batch", "run", f"{s3}/list.jsonl", "-o", f"{s3}/from_manifest", "--engine", "opencv", "--progress", "off")
    assert r.code == 0, r.err
    assert sorted(storage.sizes_under(f"{s3}/from_manifest")) == ["a/coffee.jpg", "photos/sub/astronaut.png",
                                                                   "report.jsonl"]  # inside the manifest's folder
    bad = f"{s3}/bad.jsonl"
    storage.write_bytes(bad, b'{"image": "photos/coffee.png", "dilate": 3}\n')
    r = cli("batch", "run", bad, "-o", f"{s3}/never", "--engine", "opencv")
    assert r.code == 2 and "bad.jsonl:1" in r.err and not storage.exists(f"{s3}/never")
