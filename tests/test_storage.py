"""Storage by URL (cleanplate.storage): the batch job reads and writes fsspec URLs as it does local paths.

fsspec's ``memory://`` store stands in for an object store here (process-wide, no server): the folder-pairing
rule lists a URL as it lists a folder, manifests name URLs, writes are whole objects, the report on a store is
fragments merged at the end, and `cleanplate batch run memory://... -o memory://...` writes the same bytes as
the local run. tests/test_batch_s3.py does the same against an S3 server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from cleanplate import storage
from cleanplate.batch import ReportRecord, load_items, read_report
from cleanplate.batch.items import pair_folder
from cleanplate.batch.report import ObjectReportWriter, merge_fragments, read_records, summarize


@pytest.fixture
def mem():
    """A fresh ``memory://`` store, emptied after the test."""
    fs = fsspec.filesystem("memory")
    root = f"memory://t{id(fs)}-{np.random.randint(1 << 30)}"
    yield root
    storage.remove_tree(root)


def _put(url: str, data: bytes = b"") -> None:
    storage.write_bytes(url, data)


def test_locations():
    assert storage.as_loc("photos/a.png") == Path("photos/a.png")
    assert storage.as_loc("file:///tmp/x") == Path("/tmp/x")
    assert storage.as_loc("s3://bucket/photos/") == "s3://bucket/photos"
    assert storage.is_url("s3://b/k") and not storage.is_url("file:///x") and not storage.is_url(Path("x"))
    assert storage.join("s3://b/p", "a/b.png") == "s3://b/p/a/b.png"
    assert storage.join("s3://b/p", "gs://c/d.png") == "gs://c/d.png"
    assert storage.join(Path("/m"), "a.png") == Path("/m/a.png")
    assert storage.parent("s3://b/p/list.jsonl") == "s3://b/p" and storage.parent("s3://b") == "s3://b"
    assert storage.name("s3://b/p/x.JPG") == "x.JPG" and storage.suffix("s3://b/p/x.JPG") == ".jpg"
    assert storage.relative_inside("s3://b/out/review", "s3://b/out") == "review"
    assert storage.relative_inside("s3://b/outer", "s3://b/out") is None
    assert storage.relative_inside(Path("/a/b"), "s3://b/a") is None


def test_read_write_exists_sizes(mem, tmp_path):
    url = f"{mem}/d/a.bin"
    assert not storage.exists(url) and storage.size(url) is None
    storage.write_bytes(url, b"12345")
    assert storage.read_bytes(url) == b"12345" and storage.read_head(url, 2) == b"12"
    assert storage.exists(url) and storage.size(url) == 5 and storage.isdir(f"{mem}/d")
    assert storage.sizes_under(mem) == {"d/a.bin": 5}
    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # absent: nothing
    local = tmp_path / "x" / "y.bin"
    storage.write_bytes(local, b"abc")  # imaging.write_atomic: folders made, no temp file left
    assert local.read_bytes() == b"abc" and [p.name for p in local.parent.iterdir()] == ["y.bin"]
    assert storage.sizes_under(tmp_path) == {"x/y.bin": 3}


def test_pairing_rule_is_the_same_on_a_url(mem, tmp_path):
    """Images and masks listed from a URL pair exactly as the same names in local folders."""
    names = ("a.jpg", "b.webp", "c.bmp", ".hidden.png", "notes.txt", "sub/d.png", "sub/.e/f.png", "z.png")
    masks = ("a.jpg", "a.webp", "a.png", "b.jpg", "b.webp", "c.tif", ".c.png", "sub/d.jpg", "z.png")
    for n in names:
        _put(f"{mem}/images/{n}")
        (tmp_path / "images" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / n).write_bytes(b"")
    for n in masks:
        _put(f"{mem}/masks/{n}")
        (tmp_path / "masks" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks" / n).write_bytes(b"")
    for recursive in (True, False):
        local = [(p.rel, p.mask and storage.relative_inside(p.mask, tmp_path / "masks"))
                 for p in pair_folder(tmp_path / "images", tmp_path / "masks", recursive=recursive)]
        remote = [(p.rel, p.mask and storage.relative_inside(p.mask, f"{mem}/masks"))
                  for p in pair_folder(f"{mem}/images", f"{mem}/masks", recursive=recursive)]
        assert remote == local
    assert [p.image for p in pair_folder(f"{mem}/images", None)][0] == f"{mem}/images/a.jpg"
    # the output folder inside the source is left out, as locally
    _put(f"{mem}/images/out/q.png")
    keys = [i.key for i in load_items(f"{mem}/images", exclude=[f"{mem}/images/out"])]
    assert keys == ["a.jpg", "b.webp", "c.png", "z.png", "sub/d.png"]


def test_manifest_on_a_url(mem):
    lines = [{"image": "img/0.png", "mask": "mask/0.png", "seed": 3},
             {"image": f"{mem}/elsewhere/1.png", "output": "one.jpg"}]
    _put(f"{mem}/m/list.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    a, b = load_items(f"{mem}/m/list.jsonl")
    assert (a.key, a.image, a.mask, a.options.seed) == ("img/0.png", f"{mem}/m/img/0.png", f"{mem}/m/mask/0.png", 3)
    assert (b.key, b.image, b.mask) == ("one.jpg", f"{mem}/elsewhere/1.png", None)
    _put(f"{mem}/m/list.csv", b"\xef\xbb\xbfimage,mask\nimg/2.png,mask/2.png\n")
    (c,) = load_items(f"{mem}/m/list.csv")
    assert (c.key, c.mask) == ("img/2.png", f"{mem}/m/mask/2.png")


def test_object_report_fragments_merge(mem):
    url = f"{mem}/out/report.jsonl"
    w = ObjectReportWriter(url, "20260101T000000Z-1", flush_lines=2, flush_every_s=3600)
    for k in "abc":
        w.append(ReportRecord(key=k, status="ok", bytes=1))
    # a and b are a fragment already; c is buffered (a kill now would lose only c)
    assert [r.key for r in read_records(url)[0]] == ["a", "b"]
    w.close()
    assert storage.exists(url) and not storage.isdir(url + ".parts")
    w2 = ObjectReportWriter(url, "20260101T000001Z-2", flush_lines=1)
    w2.append({"key": "a", "status": "error", "error": {"code": "internal"}})  # killed before close: not merged
    records, bad = read_records(url)
    assert [r.key for r in records] == ["a", "b", "c", "a"] and bad == 0
    assert summarize(url)["errors"] == 1
    merge_fragments(url)
    assert read_records(url)[0] == records and storage.read_bytes(url).count(b"\n") == 4


def _photo_set(photos, root: Path) -> None:
    for i, name in enumerate(["coffee", "chelsea", "astronaut"]):
        px = np.ascontiguousarray(photos[name][40:136, 60:188])
        (root / "photos" / "sub").mkdir(parents=True, exist_ok=True)
        (root / "masks" / "sub").mkdir(parents=True, exist_ok=True)
        where = "sub/" if i == 2 else ""
        Image.fromarray(px).save(root / "photos" / f"{where}{name}.png")
        m = np.zeros(px.shape[:2], np.uint8)
        m[30 + 5 * i:60, 40:80] = 255
        Image.fromarray(m).save(root / "masks" / f"{where}{name}.png")


def _upload(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.write_bytes(f"{url}/{p.relative_to(local).as_posix()}", p.read_bytes())


def test_batch_run_memory_url_equals_local(cli, gated_bundle, photos, mem, tmp_path):
    """The whole run (folder + masks, gate on, review) on URLs: same bytes, same report fields, then a
    resume that skips every item."""
    _photo_set(photos, tmp_path)
    _upload(tmp_path, mem)
    args = ["--bundle", gated_bundle, "--dilate-px", 2, "--threshold", 0.5, "--max-attempts", 1, "--progress", "off"]
    r = cli("batch", "run", tmp_path / "photos", "--masks", tmp_path / "masks", "-o", tmp_path / "out", *args)
    assert r.code == 0, r.err
    r = cli("batch", "run", f"{mem}/photos", "--masks", f"{mem}/masks", "-o", f"{mem}/out", *args)
    assert r.code == 0, r.err
    local = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*")
             if p.is_file() and p.name not in ("report.jsonl", "item.json", ".cleanplate-batch.lock")}
    remote = {k: storage.read_bytes(f"{mem}/out/{k}") for k in storage.sizes_under(f"{mem}/out")
              if not k.endswith(("report.jsonl", "item.json"))}
    assert sorted(local) == sorted(remote) and len(local) >= 3
    assert all(local[k] == remote[k] for k in local)
    lines, _ = read_report(f"{mem}/out/report.jsonl")
    assert sorted(x["key"] for x in lines) == ["chelsea.png", "coffee.png", "sub/astronaut.png"]
    assert all(x["status"] == "ok" and x["output"] == f"{mem}/out/{x['key']}" for x in lines)
    for x in lines:
        if x["review"]:
            assert json.loads(storage.read_bytes(f"{x['review']}/item.json"))["key"] == x["key"]
    r = cli("batch", "run", f"{mem}/photos", "--masks", f"{mem}/masks", "-o", f"{mem}/out", *args)
    assert r.code == 0 and "3 done before" in r.out + r.err
    assert len(read_report(f"{mem}/out/report.jsonl")[0]) == 3
    r = cli("batch", "summarize", f"{mem}/out/report.jsonl", "--json")
    assert r.code == 0 and json.loads(r.out)["ok"] == 3


def test_missing_url_source_and_protocol_package(cli, tmp_path, mem):
    r = cli("batch", "run", f"{mem}/nope", "-o", tmp_path / "out", "--engine", "opencv")
    assert r.code == 2 and "no such file or folder" in r.err
    from test_extras import SITECUSTOMIZE

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=("s3fs",)))
    code = "import sys; from cleanplate.cli import main; sys.argv[0] = 'cleanplate'; main()"
    run = subprocess.run([sys.executable, "-c", code, "batch", "run", "s3://bucket/photos", "-o", str(tmp_path / "o")],
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith('pip install "cleanplate[storage]"'), run.stderr
