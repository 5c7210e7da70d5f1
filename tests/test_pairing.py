"""One rule pairs a folder of images with a folder of masks (cleanplate.batch.items.pair_folder): `cleanplate
remove DIR`, `batch run DIR` and `flywheel generate DIR` pick the same mask for each image."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanplate.batch.items import load_items, pair_folder
from cleanplate.cli import _folder_pairs
from cleanplate.errors import ErrorCode, InputError
from cleanplate.training.flywheel import load_pairs


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # listing only: nothing is decoded
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("a.jpg", "b.webp", "c.bmp", ".hidden.png", "notes.txt", "sub/d.png"):
        _touch(images / name)
    for name in ("a.jpg", "a.webp", "a.png", "b.jpg", "b.webp", "c.tif", ".c.png", "sub/d.jpg"):
        _touch(masks / name)
    return images, masks


def test_the_rule(folders):
    """Image suffixes only, hidden files skipped, sorted; the same relative name with any image suffix, a .png
    before the others, else the first by name; subfolders only when recursive."""
    images, masks = folders
    flat = {p.rel: p.mask.name for p in pair_folder(images, masks, recursive=False)}
    assert flat == {"a.jpg": "a.png", "b.webp": "b.jpg", "c.bmp": "c.tif"}
    deep = [(p.rel, p.mask and p.mask.relative_to(masks).as_posix()) for p in pair_folder(images, masks)]
    assert deep == [("a.jpg", "a.png"), ("b.webp", "b.jpg"), ("c.bmp", "c.tif"), ("sub/d.png", "sub/d.jpg")]
    assert [p.mask for p in pair_folder(images, None)] == [None] * 4


def test_remove_batch_and_flywheel_pick_the_same_masks(folders, tmp_path):
    images, masks = folders
    rule = {p.image: p.mask for p in pair_folder(images, masks, recursive=False)}
    remove = {img: mask for img, mask, _ in _folder_pairs(images, masks, tmp_path / "out")}
    batch = {item.image: item.mask for item in load_items(images, masks=masks) if item.image.parent == images}
    flywheel = {pair.source: pair.mask for pair in load_pairs(images, masks)}
    assert remove == batch == flywheel == rule


def test_a_missing_mask(folders, tmp_path):
    """remove stops (missing_mask), batch reports the item, flywheel stops (bad_option); the same message."""
    images, masks = folders
    (masks / "b.jpg").unlink()
    (masks / "b.webp").unlink()
    message = "no mask named b.* in " + str(masks)
    with pytest.raises(InputError, match="no mask named b") as remove:
        _folder_pairs(images, masks, tmp_path / "out")
    assert remove.value.code == ErrorCode.MISSING_MASK and str(remove.value) == message
    problems = {item.key: item.problem for item in load_items(images, masks=masks) if item.problem}
    assert problems == {"b.webp": (ErrorCode.MISSING_MASK, message)}
    with pytest.raises(InputError) as flywheel:
        load_pairs(images, masks)
    assert flywheel.value.code == ErrorCode.BAD_OPTION and str(flywheel.value) == message
