"""numres.data.ImageFolder: torchvision's layout, class order and extensions, and clear errors for bad files."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from numres.data import transforms as T
from numres.data.imagefolder import (IMG_EXTENSIONS, SHAPE_CLASSES, BadImageError, ImageFolder,
                                     make_shapes_folder)


def write(path, pixels=None, mode="RGB", size=(6, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    (image if mode == "RGB" else image.convert(mode)).save(path)
    return pixels


def test_torchvisions_extensions():
    # torchvision.datasets.folder.IMG_EXTENSIONS, as documented.
    assert IMG_EXTENSIONS == (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def test_layout_classes_and_order(tmp_path):
    root = tmp_path / "root"
    for relative in ("dog/b.png", "dog/a.PNG", "dog/sub/c.jpg", "cat/z.bmp", "cat/y.jpeg", "Zebra/1.png",
                     "bird/x.tiff"):
        write(str(root / relative))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "thumb.gif").write_bytes(b"GIF89a")             # GIF is not in torchvision's list
    write(str(root / "loose.png"))                                  # files beside the class folders are ignored
    dataset = ImageFolder(root)
    assert dataset.classes == ["Zebra", "bird", "cat", "dog"]       # sorted by name (upper case first)
    assert dataset.class_to_idx == {"Zebra": 0, "bird": 1, "cat": 2, "dog": 3}
    relative = [(os.path.relpath(path, root), target) for path, target in dataset.samples]
    assert relative == [("Zebra/1.png", 0), ("bird/x.tiff", 1), ("cat/y.jpeg", 2), ("cat/z.bmp", 2),
                        ("dog/a.PNG", 3), ("dog/b.png", 3), ("dog/sub/c.jpg", 3)]
    assert dataset.imgs == dataset.samples and dataset.targets.tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert len(dataset) == 7


def test_items_are_the_files_pixels_in_rgb(tmp_path):
    pixels = write(str(tmp_path / "a" / "rgb.png"))
    write(str(tmp_path / "a" / "grey.png"), pixels, mode="L")
    write(str(tmp_path / "b" / "palette.png"), pixels, mode="P")
    write(str(tmp_path / "b" / "alpha.png"), pixels, mode="RGBA")
    dataset = ImageFolder(tmp_path)
    by_name = {os.path.basename(path): dataset[i] for i, (path, _) in enumerate(dataset.samples)}
    image, target = by_name["rgb.png"]
    assert target == 0 and image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
    for name in ("grey.png", "palette.png", "alpha.png"):
        image, _ = by_name[name]
        with Image.open(tmp_path / ("a" if name == "grey.png" else "b") / name) as original:
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))
    # a transform (given the generator) and a target transform
    dataset = ImageFolder(tmp_path, transform=T.Compose([T.CenterCrop(2), T.ToArray()]),
                          target_transform=lambda t: t + 10)
    x, target = dataset.sample(0, np.random.default_rng(0))
    assert x.shape == (3, 2, 2) and target == 10


def test_empty_folders_are_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"no class folder in {tmp_path}"):
        ImageFolder(tmp_path)
    write(str(tmp_path / "full" / "a.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"no image file in the class folder.*{tmp_path / 'empty'}"):
        ImageFolder(tmp_path)
    dataset = ImageFolder(tmp_path, allow_empty=True)
    assert dataset.classes == ["empty", "full"] and len(dataset) == 1 and dataset.targets.tolist() == [1]


def test_corrupt_files_name_the_file_or_are_skipped_and_counted(tmp_path):
    paths = make_shapes_folder(tmp_path, per_class=2, size=(24, 20), corrupt=1)
    (tmp_path / SHAPE_CLASSES[0] / "garbage.png").write_bytes(b"this is not a png")
    dataset = ImageFolder(tmp_path, transform=T.Compose([T.Resize(8), T.CenterCrop(8), T.ToArray()]))
    assert len(dataset) == len(paths) + 1
    broken = [i for i, (path, _) in enumerate(dataset.samples) if "broken" in path or "garbage" in path]
    assert len(broken) == 4
    for i in broken:
        with pytest.raises(BadImageError, match=f"cannot read image {dataset.samples[i][0]}"):
            dataset[i]
    assert sorted(dataset.check()) == sorted(dataset.samples[i][0] for i in broken)
    skipping = ImageFolder(tmp_path, transform=dataset.transform, skip_bad=True)
    items = [skipping.sample(i) for i in range(len(skipping))]
    assert [i for i, item in enumerate(items) if item is None] == broken
    assert len(skipping.bad_files) == 4 and all(item[0].shape == (3, 8, 8) for item in items if item is not None)


def test_other_errors_in_a_transform_name_the_file(tmp_path):
    write(str(tmp_path / "a" / "x.png"))

    def failing(image):
        raise RuntimeError("my transform broke")

    with pytest.raises(RuntimeError, match="my transform broke") as info:
        ImageFolder(tmp_path, transform=failing)[0]
    assert any(str(tmp_path / "a" / "x.png") in note for note in info.value.__notes__)


def test_shapes_folder_is_learnable_by_colour(tmp_path):
    make_shapes_folder(tmp_path, per_class=4, size=(40, 30))
    dataset = ImageFolder(tmp_path, transform=T.ToArray())
    assert dataset.classes == sorted(SHAPE_CLASSES)
    formats = {os.path.splitext(path)[1] for path, _ in dataset.samples}
    assert formats == {".jpg", ".png"}
    # Each class's shape is the only place where one channel exceeds both others by over 100 levels
    # (the grey background's channels differ by at most 80): blue for triangles, green for squares, red for circles.
    channel = {"blue_triangle": 2, "green_square": 1, "red_circle": 0}
    for i in range(len(dataset)):
        x, target = dataset[i]
        assert x.shape == (3, 30, 40)
        pixels = x.reshape(3, -1) * 255
        dominant = [np.mean(pixels[c] - np.delete(pixels, c, axis=0).max(axis=0) > 100) for c in range(3)]
        expected = channel[dataset.classes[target]]
        assert dominant[expected] > 0.05 and max(np.delete(dominant, expected)) < 0.01, dominant


def test_seeded_split_keeps_a_share_of_every_class(tmp_path):
    make_shapes_folder(tmp_path, per_class=10, size=(16, 12))
    (tmp_path / "single").mkdir()
    write(str(tmp_path / "single" / "only.png"))
    dataset = ImageFolder(tmp_path)
    train, validation = dataset.split(0.3, seed=4)
    assert sorted(train + validation) == list(range(len(dataset))) and not set(train) & set(validation)
    counts = np.bincount(dataset.targets[validation], minlength=4)
    assert counts.tolist() == [3, 3, 3, 0]                # round(0.3 * 10) per class; a 1-file class stays in train
    assert dataset.split(0.3, seed=4) == (train, validation) and dataset.split(0.3, seed=5) != (train, validation)
    part = dataset.subset(validation, transform=T.ToArray())
    assert len(part) == 9 and part.classes == dataset.classes and part.transform is not dataset.transform
    assert [path for path, _ in part.samples] == [dataset.samples[i][0] for i in validation]
    assert part.targets.tolist() == dataset.targets[validation].tolist() and part[0][0].shape == (3, 12, 16)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dataset.split(1.0)
