"""Batch items: the per-item options, and listing a folder or a manifest (JSONL, CSV, RORem meta.json) into
:class:`BatchItem`\\ s with their output names."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import ValidationError

from .. import imaging, storage
from ..errors import ErrorCode, InputError
from ..options import OPTION_FIELDS, RemovalOptions

log = logging.getLogger("cleanplate.batch")

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".json")
MaskChannel = Literal["luma", "alpha"]


class ItemOptions(RemovalOptions):
    """Per-item removal options (:class:`~cleanplate.options.RemovalOptions`, declared once); None = the run's
    option (``cleanplate batch run --seed ...``), then the engine's default."""

    def over(self, base: ItemOptions) -> ItemOptions:
        """These options with the unset ones taken from ``base``."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


@dataclass(frozen=True)
class BatchItem:
    """One image to clean.

    Attributes:
        key: the output name, relative to the output folder, POSIX separators ("shoes/123.jpg"); unique
            in a run and the item's identity in the report (resume matches on it).
        image: the source image file: a local Path or a URL (:data:`cleanplate.storage.Loc`).
        mask: the mask file (Path or URL), or None: the image's transparent pixels, else (``auto_mask``) the
            overlay detector's mask (the rule: :mod:`cleanplate.masks`).
        options: per-item options (manifest columns).
        origin: where the item came from, for messages ("photos/a.jpg", "list.jsonl:12").
        problem: ``(code, message)`` when the listing already knows the item cannot run (no mask found);
            the run reports it as an error without reading anything.
    """

    key: str
    image: storage.Loc
    mask: storage.Loc | None
    options: ItemOptions = field(default_factory=ItemOptions)
    origin: str = ""
    problem: tuple[ErrorCode, str] | None = None
    auto_mask: bool = False  # ``batch run --auto-mask``: without a mask file or transparency, detect overlays

    @property
    def fmt(self) -> str:
        """The output format ("png", "jpeg", "webp", "tiff"), from the key's suffix."""
        return imaging.format_for_path(self.key)


# -- listing -------------------------------------------------------------------------------------------
def load_items(source: str | os.PathLike, *, masks: str | os.PathLike | None = None, fmt: str | None = None,
               exclude: Sequence[str | os.PathLike] = (), auto_mask: bool = False) -> list[BatchItem]:
    """The items of a folder or a manifest.

    Args:
        source: a local path or an fsspec URL (``s3://bucket/photos``, :mod:`cleanplate.storage`) of a
            folder of images (searched recursively; hidden files skipped), or of a manifest:
            ``.jsonl`` (one object per line), ``.csv`` (a header row) or a RORem ``meta.json`` (a list of
            {"source", "mask", ...}; other keys such as "GT" are ignored). Manifest fields: ``image``
            (or ``source``), ``mask`` (optional: absent/empty = the image's transparency), ``output``
            (optional output name), and the :class:`ItemOptions` fields. Relative paths are relative to
            the manifest's folder; absolute paths and URLs are taken as they are.
        masks: with a folder, a folder of masks with the same relative names and any image suffix
            (``photos/a/b.jpg`` -> ``masks/a/b.png``); None = each image's transparency is its mask.
        fmt: output format for every item whose output name is not given ("png", "jpeg", "webp", "tiff");
            None = the input's (inputs we cannot write, such as BMP, become PNG).
        exclude: folders to leave out of a folder walk (the output folder when it lies inside).
        auto_mask: items without a mask file (none named, or none found in ``masks``) and without transparent
            pixels get the overlay detector's mask (:mod:`cleanplate.masks`) instead of an error.

    Returns:
        Items in listing order (sorted for folders, file order for manifests), keys unique.

    Raises:
        InputError: "bad_option" for a missing source, an unknown suffix or format, no images;
            "bad_manifest" for a manifest line that does not parse, an unknown field, an option out of
            range, an unsafe or unwritable output name, or two items with one output name.
    """
    src = storage.as_loc(source)
    if fmt is not None:
        fmt = imaging.format_for_path("x." + fmt)
    if storage.isdir(src):
        items = _folder_items(src, None if masks is None else storage.as_loc(masks), fmt,
                              [storage.as_loc(p) for p in exclude])
    elif not storage.exists(src):
        raise InputError(f"no such file or folder: {src}", code=ErrorCode.BAD_OPTION)
    elif masks is not None:
        raise InputError("--masks goes with a folder of images; a manifest names each item's mask",
                         code=ErrorCode.BAD_OPTION)
    elif storage.suffix(src) == ".jsonl":
        items = _jsonl_items(src, fmt)
    elif storage.suffix(src) == ".csv":
        items = _csv_items(src, fmt)
    elif storage.suffix(src) == ".json":
        items = _meta_items(src, fmt)
    else:
        raise InputError(f"{src}: give a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})",
                         code=ErrorCode.BAD_OPTION)
    if not items:
        raise InputError(f"no images in {src}", code=ErrorCode.BAD_OPTION)
    if auto_mask:
        items = [dataclasses.replace(item, auto_mask=True,
                                     problem=None if item.problem and item.problem[0] is ErrorCode.MISSING_MASK
                                     else item.problem)
                 for item in items]
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{item.origin} and {seen[item.key]} both write {item.key!r}; give one an output "
                             f"name", code=ErrorCode.BAD_MANIFEST)
        seen[item.key] = item.origin
    return items


def _output_key(name: str, fmt: str | None, *, explicit: bool) -> str:
    """Normalise an output name: relative, no "..", a writable suffix (``fmt`` replaces a default one)."""
    parts = PurePosixPath(name.replace("\\", "/"))
    if not name or parts.is_absolute() or ".." in parts.parts or name.startswith("~"):
        raise InputError(f"output name {name!r} must be a relative path inside the output folder",
                         code=ErrorCode.BAD_MANIFEST)
    key = str(parts)
    suffix = parts.suffix.lower()
    if explicit:
        if suffix not in imaging.WRITABLE_SUFFIXES:
            raise InputError(f"output name {name!r}: use .png, .jpg, .jpeg, .webp, .tif or .tiff",
                             code=ErrorCode.BAD_MANIFEST)
        return key
    writable = suffix in imaging.WRITABLE_SUFFIXES
    if fmt is not None:  # keep a suffix that already names the format (.jpeg stays .jpeg)
        return key if writable and imaging.format_for_path(key) == fmt else str(parts.with_suffix(imaging.ImageFormat(fmt).suffix))
    return key if writable else str(parts.with_suffix(".png"))


@dataclass(frozen=True)
class FolderPair:
    """An image of a folder and its mask: ``rel`` is the image's path relative to the folder (POSIX), ``mask``
    the mask file, or None (no mask folder, or no mask of that name: :meth:`missing_mask` says so). Locations
    are Paths for a local folder, URLs for a URL's (:data:`cleanplate.storage.Loc`)."""

    image: storage.Loc
    rel: str
    mask: storage.Loc | None

    def missing_mask(self, masks: storage.Loc) -> str:
        return f"no mask named {PurePosixPath(self.rel).with_suffix('')}.* in {masks}"


def pair_folder(folder: storage.Loc, masks: storage.Loc | None, *, recursive: bool = True,
                exclude: Sequence[storage.Loc] = ()) -> list[FolderPair]:
    """The one rule that pairs a folder of images with a folder of masks (``cleanplate remove DIR --mask
    MASKS``, ``batch run DIR --masks MASKS``, ``flywheel generate DIR --masks MASKS``).

    Images: files with an image suffix (:data:`imaging.IMAGE_SUFFIXES`), hidden files and folders skipped,
    sorted by name; with ``recursive`` every subfolder too, except ``exclude`` and the mask folder. An image's
    mask: the file in ``masks`` with the same relative name and any image suffix (``photos/a/b.jpg`` ->
    ``masks/a/b.png``); a ``.png`` wins over other suffixes of that name, else the first by name. The caller
    checks that ``masks`` is a folder (its messages name its own option). ``folder`` and ``masks`` may be
    local Paths or fsspec URLs (:func:`cleanplate.storage.walk_files`: one listing each, the same order).
    """
    skip = [*exclude, *([masks] if masks is not None else [])]
    mask_index: dict[str, storage.Loc] = {}
    if masks is not None:  # one listing of the mask folder, not one glob per image
        for path, rel in _walk_images(masks, (), recursive):
            stem = str(PurePosixPath(rel).with_suffix(""))
            old = mask_index.get(stem)
            if old is None or (storage.suffix(path) == ".png" and storage.suffix(old) != ".png"):
                mask_index[stem] = path  # a .png wins over other suffixes of the same name
    pairs = []
    for path, rel in _walk_images(folder, skip, recursive):
        pairs.append(FolderPair(path, rel, mask_index.get(str(PurePosixPath(rel).with_suffix("")))))
    return pairs


def _folder_items(folder: storage.Loc, masks: storage.Loc | None, fmt: str | None,
                  exclude: list[storage.Loc]) -> list[BatchItem]:
    if masks is not None and not storage.isdir(masks):
        raise InputError(f"--masks must be a folder: {masks}", code=ErrorCode.BAD_OPTION)
    items = []
    for pair in pair_folder(folder, masks, exclude=exclude):
        problem = None
        if masks is not None and pair.mask is None:
            problem = (ErrorCode.MISSING_MASK, pair.missing_mask(masks))
        items.append(BatchItem(_output_key(pair.rel, fmt, explicit=False), pair.image, pair.mask, origin=pair.rel,
                               problem=problem))
    return items


def _walk_images(root: storage.Loc, skip: Sequence[storage.Loc],
                 recursive: bool = True) -> Iterator[tuple[storage.Loc, str]]:
    return ((p, rel) for p, rel in storage.walk_files(root, recursive=recursive, skip=skip)
            if storage.suffix(p) in imaging.IMAGE_SUFFIXES)


def _manifest_item(fields: dict[str, Any], root: storage.Loc, where: str, fmt: str | None) -> BatchItem:
    fields = dict(fields)
    image = fields.pop("image", None)
    source = fields.pop("source", None)
    if image is None:
        image = source
    elif source is not None:
        raise InputError(f"{where}: give image or source, not both", code=ErrorCode.BAD_MANIFEST)
    if not isinstance(image, str) or not image:
        raise InputError(f"{where}: needs an image path (field image or source)", code=ErrorCode.BAD_MANIFEST)
    mask = fields.pop("mask", None)
    if mask is not None and not isinstance(mask, str):
        raise InputError(f"{where}: mask must be a path", code=ErrorCode.BAD_MANIFEST)
    output = fields.pop("output", None)
    if output is not None and not isinstance(output, str):
        raise InputError(f"{where}: output must be a file name", code=ErrorCode.BAD_MANIFEST)
    try:
        options = ItemOptions(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(map(str, err["loc"]))
        hint = f" (fields: image, mask, output, {', '.join(OPTION_FIELDS)})" if err["type"] == "extra_forbidden" else ""
        raise InputError(f"{where}: {name}: {err['msg']}{hint}", code=ErrorCode.BAD_MANIFEST) from exc
    image_path = storage.join(root, image)
    if output:
        key = _output_key(output, fmt, explicit=True)
    else:  # the image's path relative to the manifest, or its file name when it lies elsewhere
        default = storage.relative_inside(image_path, root) or storage.name(image_path)
        key = _output_key(default, fmt, explicit=False)
    return BatchItem(key, image_path, storage.join(root, mask) if mask else None, options, where)


def _manifest_text(path: storage.Loc) -> str:
    try:
        return storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{storage.name(path)}: not UTF-8 text", code=ErrorCode.BAD_MANIFEST) from exc


def _jsonl_items(path: storage.Loc, fmt: str | None) -> list[BatchItem]:
    items = []
    root = storage.parent(path)
    for n, line in enumerate(io.StringIO(_manifest_text(path), newline=None), 1):
        if not line.strip():
            continue
        where = f"{storage.name(path)}:{n}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON: {exc.msg}", code=ErrorCode.BAD_MANIFEST) from exc
        if not isinstance(fields, dict):
            raise InputError(f"{where}: each line must be a JSON object", code=ErrorCode.BAD_MANIFEST)
        items.append(_manifest_item(fields, root, where, fmt))
    return items


def _csv_items(path: storage.Loc, fmt: str | None) -> list[BatchItem]:
    items = []
    with io.StringIO(_manifest_text(path).removeprefix("\ufeff"), newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{storage.name(path)}:{reader.line_num}"
            if None in row:
                raise InputError(f"{where}: more cells than header columns", code=ErrorCode.BAD_MANIFEST)
            fields = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            items.append(_manifest_item({k: v for k, v in fields.items() if v not in ("", None)},
                                        storage.parent(path), where, fmt))
    return items


def _meta_items(path: storage.Loc, fmt: str | None) -> list[BatchItem]:
    label = storage.name(path)
    try:
        entries = json.loads(_manifest_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{label}: not JSON: {exc.msg} (line {exc.lineno})", code=ErrorCode.BAD_MANIFEST) from exc
    if not isinstance(entries, list):
        raise InputError(f"{label}: a RORem meta.json is a JSON list of {{source, mask, ...}}",
                         code=ErrorCode.BAD_MANIFEST)
    items = []
    for i, entry in enumerate(entries):
        where = f"{label}[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: must be an object", code=ErrorCode.BAD_MANIFEST)
        keep = {"image", "source", "mask", "output", *OPTION_FIELDS}  # RORem's GT, score, ... are not ours
        items.append(_manifest_item({k: v for k, v in entry.items() if k in keep}, storage.parent(path), where, fmt))
    return items
