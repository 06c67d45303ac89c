"""A folder of images, one sub-folder per class: torchvision's ``ImageFolder`` layout and conventions.

::

    root/cat/0001.jpg          classes        sorted sub-folder names: ["cat", "dog"]
    root/cat/more/0002.png     class_to_idx   {"cat": 0, "dog": 1}
    root/dog/0003.jpeg         samples        [(path, class index), ...], classes in order, and
                                              within a class the files of os.walk sorted by name

A file belongs to the dataset when its name ends (in any case) with one of
:data:`IMG_EXTENSIONS`, torchvision's list.  A class folder with no such file, or a
root with no class folder, is an error naming the folder.

``dataset[i]`` opens the image, converts it to RGB and applies ``transform``; the loader
calls :meth:`ImageFolder.sample` with a per-sample generator instead.  An RGB JPEG is
handed to the transform opened but not decoded, so that a resizing first transform
can decode it at reduced size (see :mod:`numres.data.transforms`).

A file Pillow cannot read raises :class:`BadImageError` naming it.  With
``skip_bad=True`` such a file is skipped instead (``sample`` returns None, the loader
drops it from its batch) and counted in :attr:`ImageFolder.bad_files`.
"""
from __future__ import annotations

import copy
import os

import numpy as np

from ..imagenet import _pillow

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def has_image_extension(filename: str, extensions=IMG_EXTENSIONS) -> bool:
    return filename.lower().endswith(tuple(extensions))


def find_classes(root) -> tuple:
    """``(classes, class_to_idx)``: the sorted names of the sub-folders of ``root``."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"found no class folder in {root}: ImageFolder expects one sub-folder per class "
                                f"(root/<class>/<image>)")
    return classes, {name: index for index, name in enumerate(classes)}


def make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, is_valid_file=None, allow_empty=False) -> list:
    """``[(path, class index), ...]``: every image file under each class folder, in torchvision's order."""
    root = os.fspath(root)
    if is_valid_file is None:
        def is_valid_file(path):
            return has_image_extension(path, extensions)
    samples, empty = [], []
    for name in sorted(class_to_idx, key=class_to_idx.get):
        folder = os.path.join(root, name)
        found = 0
        for directory, _, filenames in sorted(os.walk(folder, followlinks=True)):
            for filename in sorted(filenames):
                path = os.path.join(directory, filename)
                if is_valid_file(path):
                    samples.append((path, class_to_idx[name]))
                    found += 1
        if not found:
            empty.append(folder)
    if empty and not allow_empty:
        raise FileNotFoundError(f"found no image file in the class folder(s) {', '.join(empty)}; image files "
                                f"end with one of {', '.join(extensions)}")
    return samples


def open_image(path):
    """Open ``path`` with Pillow, unread (decoding happens on first use); BadImageError if it is no image."""
    Image = _pillow()
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"cannot read image {path}: {exc}") from exc


class ImageFolder:
    """``root/<class>/<image>`` files as ``(transform(image), class index)`` samples.

    ``transform`` takes the RGB Pillow image (and a generator, for numres's transforms);
    ``target_transform`` the class index.  ``skip_bad=True`` skips unreadable files,
    counting them in ``bad_files``, instead of raising :class:`BadImageError`.
    """

    def __init__(self, root, transform=None, target_transform=None, is_valid_file=None, allow_empty=False,
                 skip_bad=False, extensions=IMG_EXTENSIONS):
        self.root = os.fspath(root)
        self.classes, self.class_to_idx = find_classes(self.root)
        self.samples = make_dataset(self.root, self.class_to_idx, extensions, is_valid_file, allow_empty)
        if not self.samples:
            raise FileNotFoundError(f"found no image file under {self.root}")
        self.extensions = tuple(extensions)
        self.targets = np.array([target for _, target in self.samples], dtype=np.int64)
        self.transform, self.target_transform = transform, target_transform
        self.skip_bad = skip_bad
        self.bad_files: list = []

    @property
    def imgs(self):
        return self.samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        item = self.sample(index)
        if item is None:
            raise BadImageError(f"cannot read image {self.samples[index][0]} (skipped: skip_bad=True)")
        return item

    def load(self, index, rng=None):
        """The transformed image ``index`` (drawing from ``rng``); None for a skipped bad file."""
        from .transforms import Transform
        path = self.samples[index][0]
        try:
            with open_image(path) as opened:
                image = opened
                if image.mode != "RGB" or image.format != "JPEG":
                    image = image.convert("RGB")           # decodes now; only RGB JPEGs profit from drafting
                if self.transform is None:
                    result = image
                elif isinstance(self.transform, Transform):
                    result = self.transform(image, rng)
                else:
                    result = self.transform(image)
                if result is opened:                       # still the file's image: detach it before closing
                    result = opened.copy()
                return result
        except BadImageError as exc:
            return self._bad(path, exc)
        except (OSError, SyntaxError) as exc:              # Pillow's words for unreadable or broken data
            return self._bad(path, BadImageError(f"cannot read image {path}: {exc}"))
        except Exception as exc:
            exc.add_note(f"while loading image {path}")
            raise

    def sample(self, index, rng=None):
        """``(image, target)`` for sample ``index``, or None for a bad file skipped (``skip_bad``)."""
        image = self.load(index, rng)
        if image is None:
            return None
        target = int(self.targets[index])
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _bad(self, path, error):
        if not self.skip_bad:
            raise error
        self.bad_files.append(path)
        return None

    def check(self) -> list:
        """Decode every file; the paths Pillow cannot read (slow: for a one-off check of a new folder)."""
        bad = []
        for path, _ in self.samples:
            try:
                with open_image(path) as image:
                    image.load()
            except (BadImageError, OSError, SyntaxError, ValueError):
                bad.append(path)
        return bad

    def subset(self, indices, transform=None) -> "ImageFolder":
        """The samples ``indices`` (in that order) as an ImageFolder of the same classes, with ``transform``."""
        indices = [int(i) for i in indices]
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.targets = self.targets[np.asarray(indices, dtype=np.int64)] if indices else self.targets[:0]
        part.transform = self.transform if transform is None else transform
        part.bad_files = []
        return part

    def split(self, fraction, seed=0) -> tuple:
        """``(train indices, validation indices)``: a seeded split keeping ``fraction`` of every class apart.

        Each class's files are permuted by ``default_rng(seed)`` (drawn class by class, in class
        order) and its first ``round(fraction * count)`` go to validation, at least one when the
        class has two files or more; both lists are in the folder's order.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        validation = []
        for target in range(len(self.classes)):
            members = np.flatnonzero(self.targets == target)
            count = len(members)
            take = min(max(int(round(fraction * count)), 1 if count >= 2 else 0), max(count - 1, 0))
            validation.extend(rng.permutation(members)[:take].tolist())
        chosen = set(validation)
        return [i for i in range(len(self)) if i not in chosen], sorted(validation)

    def __repr__(self):
        return (f"ImageFolder(root={self.root!r}, {len(self)} images, {len(self.classes)} classes, "
                f"transform={self.transform!r})")


# --- a small synthetic folder (examples, tests, benchmarks) -------------------------------------------

SHAPE_CLASSES = ("blue_triangle", "green_square", "red_circle")
_SHAPE_COLOURS = {"red_circle": (220, 40, 40), "green_square": (40, 190, 60), "blue_triangle": (40, 70, 220)}


def make_shapes_folder(root, per_class=10, size=(64, 48), seed=0, formats=("jpg", "png"), corrupt=0,
                       quality=90) -> list:
    """Write ``root/<class>/<n>.<format>``: coloured shapes on noisy grey backgrounds; returns the paths.

    Each class is one shape in one colour (``SHAPE_CLASSES``), at a random place and size,
    over uniform noise; ``size`` is ``(width, height)`` and the files alternate between
    ``formats``.  ``corrupt`` extra files per class, ``broken-<n>.jpg``, hold bytes no
    decoder accepts (a JPEG header followed by garbage).
    """
    Image = _pillow()
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for name in SHAPE_CLASSES:
        folder = os.path.join(os.fspath(root), name)
        os.makedirs(folder, exist_ok=True)
        for n in range(per_class):
            background = rng.integers(60, 180, size=(height, width, 1)) + rng.integers(-40, 40, (height, width, 3))
            image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
            radius = rng.uniform(0.2, 0.35) * min(width, height)
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _SHAPE_COLOURS[name])
            draw = ImageDraw.Draw(image)
            if name == "red_circle":
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
            elif name == "green_square":
                draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
            extension = formats[n % len(formats)]
            path = os.path.join(folder, f"{n:04d}.{extension}")
            image.save(path, quality=quality) if extension in ("jpg", "jpeg") else image.save(path)
            paths.append(path)
        for n in range(corrupt):
            path = os.path.join(folder, f"broken-{n}.jpg")
            with open(path, "wb") as stream:
                stream.write(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
            paths.append(path)
    return paths


__all__ = ["ImageFolder", "BadImageError", "IMG_EXTENSIONS", "find_classes", "make_dataset", "open_image",
           "has_image_extension",
           "make_shapes_folder", "SHAPE_CLASSES"]
