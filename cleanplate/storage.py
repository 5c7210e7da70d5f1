"""Storage by URL: the few file operations the batch job needs, on local paths and on fsspec URLs
(``s3://bucket/key``, ``gs://``, ``memory://``, ...).

A *location* (:data:`Loc`) is a local :class:`~pathlib.Path` or a URL string. :func:`as_loc` makes one from
what a user typed: ``file://`` URLs and plain paths become Paths, so every local operation stays the one it
was (``imaging.write_atomic``, ``os.walk``, filelock); any other ``scheme://`` stays a string and goes
through fsspec (https://filesystem-spec.readthedocs.io, ``fsspec.core.url_to_fs``, ``AbstractFileSystem``:
``cat_file``, ``pipe_file``, ``find``, ``info``, ``rm``), imported lazily: the base install does not grow.
fsspec's protocol packages come with the ``storage`` extra (s3fs for ``s3://``); a missing one is
:class:`~cleanplate.errors.MissingDependency` (one line naming the extra, CLI exit 2).

Writes are whole or absent: locally a temp file + fsync + rename (``imaging.write_atomic``); on an object
store one ``pipe_file`` (a single PUT, or a multipart upload that only becomes visible when completed), so
a killed writer never leaves a partial object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Union

from .errors import MissingDependency

Loc = Union[Path, str]  # a local path, or a URL string ("s3://bucket/key") for fsspec
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# The package that implements a protocol, for the missing-extra message.
_PROTOCOL_PACKAGE = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_IN_STORAGE_EXTRA = {"fsspec", "s3fs"}


def is_url(loc: object) -> bool:
    """True for a URL string that fsspec handles (``s3://...``); False for Paths and ``file://`` URLs."""
    return isinstance(loc, str) and (m := _URL.match(loc)) is not None and m.group(1).lower() != "file"


def as_loc(value: str | os.PathLike[str]) -> Loc:
    """A location from a path or URL: ``file://`` and plain paths -> Path, other URLs -> the URL (no trailing
    slash). Paths are returned as given (not resolved)."""
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    m = _URL.match(text)
    if m is None:
        return Path(text)
    if m.group(1).lower() == "file":
        return Path(text[len(m.group(0)):] or "/")
    return text.rstrip("/") if len(text.rstrip("/")) > len(m.group(0)) else text


def fs_of(url: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of a URL through ``fsspec.core.url_to_fs``.

    Raises:
        MissingDependency: fsspec or the protocol's package (s3fs, gcsfs, ...) is not installed.
    """
    protocol = url.split("://", 1)[0].lower()
    package = _PROTOCOL_PACKAGE.get(protocol, "fsspec")
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as exc:
        hint = 'pip install "cleanplate[storage]"' if package in _IN_STORAGE_EXTRA else f"pip install {package}"
        raise MissingDependency(f"{protocol}:// URLs need {package}, which the base install leaves out: "
                                f"{hint}") from exc


def join(base: Loc, *parts: str) -> Loc:
    """``base`` joined with relative POSIX ``parts`` ("a/b.png"). A part that is itself a URL or an absolute
    path replaces what came before (as :class:`~pathlib.Path` does)."""
    for part in parts:
        if _URL.match(part):
            base = as_loc(part)
        elif isinstance(base, Path) or os.path.isabs(part):
            base = Path(base) / part
        else:
            base = base.rstrip("/") + "/" + part.lstrip("/")
    return base


def parent(loc: Loc) -> Loc:
    """The folder a location lies in."""
    if isinstance(loc, Path):
        return loc.parent
    m = _URL.match(loc)
    scheme = m.group(0) if m else ""
    rest = loc[len(scheme):].rstrip("/")
    return scheme + rest.rpartition("/")[0] if "/" in rest else loc


def name(loc: Loc) -> str:
    """The last part of a location ("b.png")."""
    return loc.name if isinstance(loc, Path) else loc.rstrip("/").rpartition("/")[2]


def suffix(loc: Loc) -> str:
    """The suffix of a location's name, lower case (".png")."""
    return PurePosixPath(name(loc)).suffix.lower()


def relative_inside(loc: Loc, folder: Loc) -> str | None:
    """``loc`` relative to ``folder`` (POSIX) when it lies inside it (or is it: ""), else None."""
    if isinstance(loc, Path) and isinstance(folder, Path):
        try:
            rel = loc.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            return None
        return "" if rel == "." else rel
    if isinstance(loc, Path) or isinstance(folder, Path):
        return None
    a, b = loc.rstrip("/"), folder.rstrip("/")
    if a == b:
        return ""
    return a[len(b) + 1:] if a.startswith(b + "/") else None


# -- reading -------------------------------------------------------------------------------------------
def read_bytes(loc: Loc) -> bytes:
    """The whole file or object.

    Raises:
        OSError: FileNotFoundError and the like, from the OS or the store.
    """
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = fs_of(loc)
    return fs.cat_file(path)


def read_head(loc: Loc, n: int) -> bytes:
    """The first ``n`` bytes (fewer for a smaller file): enough for an image header.

    Raises:
        OSError: as :func:`read_bytes`.
    """
    if isinstance(loc, Path):
        with open(loc, "rb") as f:
            return f.read(n)
    fs, path = fs_of(loc)
    return fs.cat_file(path, start=0, end=n)


def read_text(loc: Loc) -> str:
    """A UTF-8 text file (a BOM is dropped)."""
    return read_bytes(loc).decode("utf-8-sig")


def exists(loc: Loc) -> bool:
    if isinstance(loc, Path):
        return loc.exists()
    fs, path = fs_of(loc)
    return bool(fs.exists(path))


def isdir(loc: Loc) -> bool:
    """A folder (an object store: a prefix with objects under it)."""
    if isinstance(loc, Path):
        return loc.is_dir()
    fs, path = fs_of(loc)
    fs.invalidate_cache(path)
    return bool(fs.isdir(path))


def size(loc: Loc) -> int | None:
    """The file's size in bytes, or None when it does not exist or cannot be read."""
    try:
        if isinstance(loc, Path):
            return loc.stat().st_size
        fs, path = fs_of(loc)
        return int(fs.info(path)["size"])
    except (OSError, KeyError, TypeError):
        return None


def sizes_under(folder: Loc) -> dict[str, int]:
    """Relative POSIX name -> size of every file under ``folder`` (one listing: resume checks a whole
    catalog's outputs without one request per item). A missing folder is empty."""
    if isinstance(folder, Path):
        out = {}
        for dirpath, _, filenames in os.walk(folder):
            for n in filenames:
                p = Path(dirpath) / n
                try:
                    out[p.relative_to(folder).as_posix()] = p.stat().st_size
                except OSError:
                    pass
        return out
    fs, root = fs_of(folder)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # other processes (workers, an earlier run) write here: list afresh
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(root + "/") and info.get("type") != "directory"}


def walk_files(root: Loc, *, recursive: bool = True, skip: Iterable[Loc] = ()) -> Iterator[tuple[Loc, str]]:
    """``(location, relative POSIX name)`` of the files under ``root``, hidden files and folders skipped,
    in ``os.walk`` order with sorted names (a folder's files, then its subfolders); with ``recursive`` False
    the top level only. Folders in ``skip`` are left out."""
    if isinstance(root, Path):
        skipped = {p.resolve() for p in skip if isinstance(p, Path)}
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith(".")
                                 and (here / d).resolve() not in skipped)
            for n in sorted(filenames):
                if not n.startswith("."):
                    p = here / n
                    yield p, p.relative_to(root).as_posix()
        return
    skip_rel = [r for r in (relative_inside(s, root) for s in skip if isinstance(s, str)) if r]
    fs, base = fs_of(root)
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, maxdepth=None if recursive else 1)
    except FileNotFoundError:
        return
    rels = []
    for p in found:
        rel = p[len(base) + 1:] if p.startswith(base + "/") else None
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        if any(rel.startswith(s + "/") for s in skip_rel):
            continue
        rels.append(rel)
    # os.walk's order: at each level a folder's files (sorted) come before its subfolders (sorted)
    rels.sort(key=lambda r: [(1, part) for part in r.split("/")[:-1]] + [(0, r.rsplit("/", 1)[-1])])
    for rel in rels:
        yield join(root, rel), rel


# -- writing -------------------------------------------------------------------------------------------
def write_bytes(loc: Loc, data: bytes) -> None:
    """Write a whole file or object, never a partial one: a local file through ``imaging.write_atomic``
    (temp file, fsync, rename; folders created), an object with one ``pipe_file``.

    Raises:
        OSError: from the OS or the store.
    """
    if isinstance(loc, Path):
        from .imaging import write_atomic

        write_atomic(loc, data)
        return
    fs, path = fs_of(loc)
    fs.pipe_file(path, data)


def remove_tree(loc: Loc) -> None:
    """Delete a folder (a prefix) and everything under it; nothing when it does not exist."""
    if isinstance(loc, Path):
        import shutil

        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = fs_of(loc)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def remove(loc: Loc) -> None:
    """Delete one file or object; nothing when it does not exist."""
    try:
        if isinstance(loc, Path):
            loc.unlink()
        else:
            fs, path = fs_of(loc)
            fs.rm_file(path)
    except FileNotFoundError:
        pass
